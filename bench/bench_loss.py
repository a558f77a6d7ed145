"""Time kdnb's attention and hidden-state terms (forward + backward) against the first masked-MSE implementation,
on tensors shaped like a 6-layer e5-small student and its 12-layer teacher. Prints numbers; not run in CI.

    python bench/bench_loss.py [--threads 2] [--repeats 20]
"""
import argparse, statistics, time
import torch
from kdnb.losses import attention_loss, embedding_loss, hidden_loss

def where_mse(a, b, mask):
    "The first implementation: torch.where on the squared difference, count over the broadcast mask."
    m = torch.broadcast_to(mask.bool(), a.shape)
    return torch.where(m, (a.float() - b.float()) ** 2, 0.).sum() / m.sum().clamp(min=1)

def old_attention_loss(att_s, att_t, layers, mask):
    pair = (mask[:, None, :, None] * mask[:, None, None, :]).bool()
    return torch.stack([where_mse(att_s[i], att_t[k], pair) for i, k in enumerate(layers)]).mean()

def old_hidden_loss(hs_s, hs_t, layers, mask, proj=None):
    "The first hidden-state term: W on every token (padding included), torch.where mask."
    W, tok = proj or torch.nn.Identity(), mask[:, :, None].bool()
    return torch.stack([where_mse(W(hs_s[i + 1]), hs_t[k + 1], tok) for i, k in enumerate(layers)]).mean()

def old_embedding_loss(e_s, e_t, mask, proj=None):
    return where_mse((proj or torch.nn.Identity())(e_s), e_t, mask[:, :, None].bool())

def stacked_attention_loss(att_s, att_t, layers, mask):
    "The 'fused MSE over stacked layers' idea: stack the mapped layers, one masked MSE over all of them."
    pair = (mask[:, None, :, None] * mask[:, None, None, :]).float()[None]
    s, t = torch.stack(list(att_s)), torch.stack([att_t[k] for k in layers])
    return (torch.nn.functional.mse_loss(s, t, reduction="none") * pair).sum() / (pair.sum() * s.shape[0] * s.shape[2])

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads); torch.manual_seed(0)
    B, H, L, D, layers = 32, 12, 64, 384, [1, 3, 5, 7, 9, 11]
    mask = torch.ones(B, L, dtype=torch.long)   # real lengths 8..63 (about half the positions are padding)
    for b, n in enumerate(torch.randint(8, L, (B,))): mask[b, n:] = 0
    att_t = [torch.rand(B, H, L, L).softmax(-1) for _ in range(12)]
    hs_t = [torch.randn(B, L, D) for _ in range(13)]
    def timed(fn, make):
        ts = []
        for r in range(a.repeats + 2):
            s = make()
            t = time.perf_counter(); loss = fn(s); loss.backward(); t = time.perf_counter() - t
            if r >= 2: ts.append(t)
        return loss.item(), statistics.median(ts) * 1000
    make_att = lambda: [torch.rand(B, H, L, L).softmax(-1).requires_grad_() for _ in layers]
    make_hid = lambda: [torch.randn(B, L, D).requires_grad_() for _ in range(7)]
    make_half = lambda: [torch.randn(B, L, D // 2).requires_grad_() for _ in range(7)]
    W = torch.nn.Linear(D // 2, D)
    with_w = lambda hid, emb: lambda s, t, layers, mask: hid(s, t, layers, mask, W) + emb(s[0], t[0], mask, W)
    print(f"batch {B}x{L} ({int(mask.sum())} real tokens), {H} heads, width {D}, 6 student layers; "
          f"median of {a.repeats} (ms, forward + backward)")
    cases = [("attention", make_att, att_t, [("kdnb", attention_loss), ("first version (torch.where)", old_attention_loss),
                                             ("stacked layers", stacked_attention_loss)]),
             ("hidden", make_hid, hs_t, [("kdnb", hidden_loss), ("first version (torch.where)", old_hidden_loss)]),
             (f"hidden + embedding, width {D // 2} -> {D} (W)", make_half, hs_t,
              [("kdnb", with_w(hidden_loss, embedding_loss)),
               ("first version (W on every token)", with_w(old_hidden_loss, old_embedding_loss))])]
    for name, make, t, fns in cases:
        res = []
        for label, fn in fns:
            torch.manual_seed(1)   # the same student tensors for every implementation
            res.append((label,) + timed(lambda s, fn=fn: fn(s, t, layers, mask), make))
        ref = res[0][1]
        print(f"{name:9s}  " + "   ".join(f"{label} {ms:6.1f} ms" for label, _, ms in res) +
              f"   same loss: {all(abs(l - ref) < 1e-5 * abs(ref) for _, l, _ in res)}")

if __name__ == "__main__": main()
