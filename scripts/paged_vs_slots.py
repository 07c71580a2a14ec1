"""Does a paged KV layout pay on a CPU? One decode step's attention, plain slots against pages + a block table.

Slots: one row of the cache per request; a step attends over each row's first `span` slots (a view, no copy)
under a per-row mask. Pages: the cache is a pool of `page`-token blocks; a request's keys are gathered through
its block table into one (B, Hkv, span, D) tensor (a copy), then the same SDPA. Both give the same numbers
(checked). Shapes default to SmolLM2-135M's (9 query heads, 3 kv heads, dim 64, 30 layers).

    python scripts/paged_vs_slots.py --rows 16 --ctx 2048 --page 256
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--page", type=int, default=256)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    B, H, Hkv, D, S, P = args.rows, 9, 3, 64, args.ctx, args.page
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(S // 8, S, (B,), generator=g)  # each row's tokens so far
    span = int(lengths.max())
    slots_k = torch.randn(B, Hkv, S, D, generator=g)  # (B, Hkv, S, D) one row per request
    slots_v = torch.randn(B, Hkv, S, D, generator=g)
    # The same keys as pages: row b's tokens [i*P, (i+1)*P) live in page table[b, i], pages shuffled in the pool.
    n_pages = B * (S // P)
    table = torch.randperm(n_pages, generator=g).view(B, S // P)  # (B, pages per row)
    pool_k = torch.empty(n_pages, Hkv, P, D)
    pool_v = torch.empty(n_pages, Hkv, P, D)
    pool_k[table] = slots_k.view(B, Hkv, S // P, P, D).transpose(1, 2)
    pool_v[table] = slots_v.view(B, Hkv, S // P, P, D).transpose(1, 2)
    q = torch.randn(B, H, 1, D, generator=g)
    mask = (torch.arange(span)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, span)

    def slots() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, slots_k[:, :, :span], slots_v[:, :, :span], attn_mask=mask,
                                              enable_gqa=True)

    def paged() -> torch.Tensor:
        used = -(-span // P)
        k = pool_k[table[:, :used]].transpose(1, 2).reshape(B, Hkv, used * P, D)[:, :, :span]  # gathered: a copy
        v = pool_v[table[:, :used]].transpose(1, 2).reshape(B, Hkv, used * P, D)[:, :, :span]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    torch.testing.assert_close(slots(), paged())
    for name, fn in (("slots", slots), ("paged", paged)):
        fn()
        start = time.perf_counter()
        for _ in range(args.repeats):
            for _ in range(args.layers):
                fn()
        ms = (time.perf_counter() - start) / args.repeats * 1e3
        print(f"{name}: {ms:.2f} ms per decode step ({args.layers} layers, {B} rows, longest {span} tokens, "
              f"page {P}, {args.threads} threads)")
    row = 2 * args.layers * Hkv * D * 4  # bytes of keys + values per token, all layers, fp32
    print(f"memory reserved: slots {B * S * row / 2**20:.0f} MiB (every row at full length); pages "
          f"{int(sum(-(-int(n) // P) * P for n in lengths)) * row / 2**20:.0f} MiB (only pages in use)")


if __name__ == "__main__":
    main()
