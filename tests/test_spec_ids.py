"Spec ids computed on the code before the redesign (main at 6b06930): a study written then must still open."
from kdnb.spec import Spec
from kdnb.paper import section_grid

SPEC_IDS = {
    'default': ({}, 'f60c4b2b578e', 'ece0800d5f5d'),
    'tiny from-base half': ({'model': 'tiny-xlmr', 'init': 'from-base', 'kd': False, 'seed': 0, 'hidden': 'half'}, 'a42c0c1ffa54', None),
    'copy-only': ({'init': 'copy-only'}, '7edfed2c50aa', 'ece0800d5f5d'),
    'copy-only base': ({'init': 'copy-only', 'copy_from': 'from-base'}, 'd8fc5848536c', None),
    'teacher seen->unseen ner': ({'init': 'teacher', 'dataset': 'demo-ner', 'train_languages': 'seen', 'test_languages': 'unseen'}, 'a2c794cb3bba', 'f8e2edf0857a'),
    'scratch subset codes': ({'init': 'from-scratch', 'subset': 0.2, 'train_languages': ['en', 'de'], 'epochs': 2}, 'ce4abf114a9c', '50516e28f92e'),
    'paper-size xlmr': ({'model': 'FacebookAI/xlm-roberta-base', 'dataset': 'massive', 'seed': 43, 'epochs': 30, 'eval_steps': 5000, 'batch_size': 8, 'max_length': 128}, '104a15c3aa73', '738904f8aaed'),
    'layer map': ({'model': 'tiny-bert', 'layers': 2, 'layer_map': [1, 3], 'seed': 0}, 'e0ee54736aaa', 'b046e3c9fa48'),
}

TINY_GRIDS = {  # the sorted spec ids of each section's tiny grid
    '4.1': ['11e2912b15d2', '1691b12f0341', '2b8e2536dad4', '32ea6fdb3b10', '3ee2683f0b41', '6e8c370921ba', '70bbe2ad95a9', '7459083ba052', '791ecc4c9b5b', '7c85868af720', '9e64c1efc7dc', 'e030a6dff710', 'e0793d6c2d8a'],
    '4.2': ['2460032571ea', '362d55d44063', '592c46a11d61', '5ecb3d5b8477', '6114fcf92c3f', '6406f4f5cf08', '84de88ae3529', '8aeb7b26ebbd', '8ceeed66d284', '9a26a1ad25d3', 'ad87884b5eaa', 'e3d85f740f40', 'e46ad2aa3668'],
    '4.3': ['07b0cc4dfa28', '54745e69f860', 'cbc22cd999f7'],
    '5.1': ['5906cf90d25b', '6e8c370921ba', '70bbe2ad95a9'],
    '5.2': ['157a4582dfd9', '1691b12f0341', '6e8c370921ba', '7459083ba052', 'e1488a5ad8ae', 'ec42c782981c'],
    '5.3': ['157a4582dfd9', '1691b12f0341', '6e8c370921ba', '7459083ba052', 'e1488a5ad8ae', 'ec42c782981c'],
}

def test_spec_ids_unchanged():
    for name, (fields, spec_id, teacher_key) in SPEC_IDS.items():
        s = Spec(**fields)
        assert (s.spec_id, s.teacher_key) == (spec_id, teacher_key), name
        assert Spec.from_json(s.to_json()).spec_id == spec_id, name

def test_tiny_section_grids_unchanged():
    for sec, ids in TINY_GRIDS.items(): assert sorted(s.spec_id for s in section_grid(sec, 'tiny')) == ids, sec
