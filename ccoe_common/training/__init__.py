"""Training experts with the backbone frozen (CCoE-25 §3.3, Eq. 5), full fine-tune baselines,
and the expert-size sweep (CCoE-24 §4.4)."""
