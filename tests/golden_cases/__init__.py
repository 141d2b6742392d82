"""Golden cases: each module defines ``CASES = {fixture_name: run}``.

``run(spec, state_dict, io) -> dict[str, Tensor]`` builds our module or model with the fixture's configuration, loads
the official ``state_dict`` through our converter / ``checkpoint_filter_fn``, runs ``io["input"]``
(eval mode, float32)
and returns our tensors keyed like the fixture's ``io`` entries to compare (``output`` at least).
"""
