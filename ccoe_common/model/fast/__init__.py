"""Hand-tuned CPU paths, apart from the plain model code in `model/layers.py` and `backbone.py`.

Each computes what the plain path computes, only faster for half precision on the CPU (where
they were measured; CUDA and fp32 take the plain path), and each has a parity test against
the plain one in tests/unit/model/fast/:

- `products.py`: one row as `torch.mv` (`Linear`, `linear`, `row_product`); the MLP and the LM
  head on a few rows as `W @ x^T`. Guarded by `test_products.py`.
- `packing.py`: q, k and v stored as one tensor, so one kernel computes all three. Guarded by
  `test_packing.py`.
- `one_row.py`: one token of one cached sequence through every layer on [D] vectors: same bits
  as the batched layers. Guarded by `test_row_path.py`.

Nothing here is imported by this package's `__init__`: `layers.py` imports `products` and
`packing`, and `one_row` imports `layers`.
"""
