"""The data path's stages: pure tensor-in, tensor-out modules with static output shapes (DESIGN.md).

preprocess -> encoders (+ texture) -> scorers -> balance -> allocation -> compression; ``head`` wires every
stage after the encoder into one module, the only place they are wired.
"""
