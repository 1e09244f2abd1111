"""Benchmark evaluation: the settings and benchmark items (`benchmarks`), one-pass option scoring and batched
generation (`scoring`), answer parsing (`answers`), the whole run (`harness`) and its files (`report`)."""
