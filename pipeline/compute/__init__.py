"""Tensor compute that explainers and metrics share, below both of them.

perturbed_forward.py  many perturbed copies of many images through the model, chunked, counted,
                      OOM-halving (the one loop every perturbation method and metric uses);
                      `blend` makes a copy from a mask and a baseline
transforms.py         geometric transforms with exact inverses (EVET, the stability index)
maps.py               per-map arithmetic: `normalise01`, `upsample`
seeds.py              per-image random generators, so draws do not depend on the batch around

(The chunking helper, pipeline/chunks.py, sits lower still: storage and the plan use it too.)
"""
