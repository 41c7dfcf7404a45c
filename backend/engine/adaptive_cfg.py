"""Adaptive CFG: Fooocus's "CFG mimicking from TSNR".

With a real scale ``cfg`` above the mimic scale ``m``, Fooocus returns
``p·eps(cfg) + (1 - p)·eps(m)`` where eps(w) = uncond + w·(cond - uncond) and
p is the sampling progress (0 at pure noise, 1 at the end). CFG is linear in
its scale, so this equals CFG with the scale ``m + (cfg - m)·p``: the mimic
scale at the noisy start, the real scale at the end. Below ``m`` it does nothing.
We apply that effective scale wherever a CFG-like scale is used (CFG, PerpNeg, APG).
"""

from __future__ import annotations


def effective_cfg(cfg: float, mimic: float, progress: float) -> float:
    if mimic <= 0.0 or cfg <= mimic:
        return cfg
    return mimic + (cfg - mimic) * progress
