"""Teacher forcing (``testbed.forcing.ForceTokens``) through a real SGLang engine."""

from __future__ import annotations

import random

import pytest

from engine_utils import GREEDY, engine, prompts

pytestmark = pytest.mark.engine

N = 48


# The overlap scheduler (SGLang's default) appends a token to output_ids only after launching the
# next step; without it, and with a chunked prefill (a 43-token prompt in 16-token chunks).
@pytest.mark.parametrize("engine_kwargs", [{}, dict(disable_overlap_schedule=True, chunked_prefill_size=16)],
                         ids=["overlap", "no-overlap-chunked"])
def test_forced_output_is_the_forced_ids(engine_kwargs):
    from testbed.forcing import OWN_GREEDY, ForceTokens
    from testbed.tiny_model import tiny_model_dir

    batch = prompts()[:3]
    rng = random.Random(0)
    forced = [[rng.randrange(3, 512) for _ in range(N)] for _ in batch]
    params = {**GREEDY, "max_new_tokens": N}
    with engine(str(tiny_model_dir()), "torch_native", enable_custom_logit_processor=True,
                **engine_kwargs) as eng:
        free = [out["output_ids"] for out in eng.generate(input_ids=batch, sampling_params=params)]
        # Forced and free requests in one batch; each forced request with its own ids.
        outputs = eng.generate(
            input_ids=batch + [batch[0]],
            sampling_params=[{**params, "custom_params": {"force_ids": ids}} for ids in forced] + [params],
            custom_logit_processor=[ForceTokens.to_str()] * len(batch) + [None])
        # Forced on its own greedy output, the model's own choice is the forced token at every step.
        own = eng.generate(input_ids=batch[0], custom_logit_processor=ForceTokens.to_str(),
                           sampling_params={**params, "custom_params": {"force_ids": free[0]}})
        # Past the end of force_ids, decoding is free again.
        tail = eng.generate(input_ids=batch[1], custom_logit_processor=ForceTokens.to_str(),
                            sampling_params={**params, "custom_params": {"force_ids": forced[1][:10]}})
    got = [out["output_ids"] for out in outputs]
    assert got[:len(batch)] == forced
    assert own["output_ids"] == free[0] and own["meta_info"][OWN_GREEDY] == free[0]
    # Forced on other ids, the first choice is still free greedy's; later ones follow the forced
    # prefix, so they part from free greedy's (which continues its own text).
    for out, free_ids in zip(outputs[:len(batch)], free):
        chosen = out["meta_info"][OWN_GREEDY]
        assert len(chosen) == N and chosen[0] == free_ids[0]
        assert chosen != free_ids
    # The free request notes nothing (SGLang pads a key another request of its batch set with None).
    assert not any(outputs[len(batch)]["meta_info"].get(OWN_GREEDY) or ())
    assert got[len(batch)] == free[0]
    for ids, free_ids in zip(forced, free):
        assert ids != free_ids
        assert sum(a == b for a, b in zip(ids, free_ids)) < N // 4  # not free greedy by chance
    assert tail["output_ids"][:10] == forced[1][:10]
    assert len(tail["output_ids"]) == N
