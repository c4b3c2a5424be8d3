"""The lm-eval adapter on a tiny jaxllm model and a tiny local task (copying on the synthetic language)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval adapter needs `lm-eval` ([dev] installs it)")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from jaxllm.config import load_config  # noqa: E402
from jaxllm.train.trainer import train  # noqa: E402

TASK_DATA = Path(__file__).parent / "data" / "lm_eval_task" / "copy.jsonl"
TASK_YAML = """
task: jaxllm_copy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from jaxllm.interop.lm_eval_adapter import JaxLLMEvalModel

    run = tmp_path_factory.mktemp("run")
    train(load_config(["tiny"], [f"checkpoint.run_dir={run}", "train.steps=5", "data.synthetic_docs=300",
                                 "checkpoint.async_save=false"]))
    return JaxLLMEvalModel(pretrained=str(run), bucket=16)


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _direct_logp(adapter, text: str) -> tuple[list[int], np.ndarray]:
    """(ids of BOS + text, log p [len - 1, vocab] of each next token): the model applied once, unbatched."""
    ids = [adapter.tok.bos_id] + adapter.tok.encode(text)
    return ids, np.asarray(jax.nn.log_softmax(adapter.lm.apply(adapter.params, np.asarray([ids[:-1]])), axis=-1)[0])


def _direct_loglikelihood(adapter, ctx: str, cont: str) -> float:
    """sum log p(cont | ctx), the character tokenizer's tokens of cont being the last len(cont)."""
    ids, logp = _direct_logp(adapter, ctx + cont)
    return sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1 - len(cont), len(ids) - 1))


def test_loglikelihood_equals_a_direct_computation(adapter):
    tok = adapter.tok
    ctx, cont = "|abcdef", "gh"
    ids, logp = _direct_logp(adapter, ctx + cont)
    expected = _direct_loglikelihood(adapter, ctx, cont)
    (score, _), = adapter.loglikelihood([_req("loglikelihood", ctx, cont)])
    assert score == pytest.approx(expected, abs=1e-4)
    greedy = tok.decode([int(np.argmax(logp[len(ids) - 3]))])  # the argmax right after ctx
    assert adapter.loglikelihood([_req("loglikelihood", ctx, greedy)])[0][1] is True
    (rolling,) = adapter.loglikelihood_rolling([_req("loglikelihood_rolling", ctx + cont)])
    full = sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
    assert rolling == pytest.approx(full, abs=1e-4)


def test_generate_until_stops_at_the_until_string(adapter):
    (free,) = adapter.generate_until([_req("generate_until", "|abc", {"max_gen_toks": 12})])
    assert len(free) == 12
    stop = free[5]
    (cut,) = adapter.generate_until([_req("generate_until", "|abc", {"max_gen_toks": 12, "until": [stop]})])
    assert cut == free[: free.index(stop)]


@pytest.mark.slow  # lm-eval's whole harness; the adapter's answers are checked by the tests above
def test_simple_evaluate_on_a_tiny_local_task(adapter, tmp_path):
    (tmp_path / "copy.yaml").write_text(TASK_YAML.format(path=TASK_DATA))
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)  # not lm-eval's thousands of tasks
    out = lm_eval.simple_evaluate(model=adapter, tasks=["jaxllm_copy"], task_manager=manager, bootstrap_iters=0)
    # the accuracy by hand: a doc counts when its label's choice (after lm-eval's " " delimiter) scores highest
    docs = [json.loads(line) for line in TASK_DATA.read_text().splitlines()]
    scores = [[_direct_loglikelihood(adapter, d["context"], " " + c) for c in d["choices"]] for d in docs]
    right = [int(np.argmax(s)) == d["label"] for s, d in zip(scores, docs)]
    for sample in out["samples"]["jaxllm_copy"]:  # and each choice's score lm-eval saw is the direct one
        got = [float(ll) for ll, _ in sample["filtered_resps"]]
        np.testing.assert_allclose(got, scores[sample["doc_id"]], atol=1e-4)
    assert out["n-samples"]["jaxllm_copy"]["effective"] == len(docs) == 6
    assert out["results"]["jaxllm_copy"]["acc,none"] == pytest.approx(np.mean(right))
