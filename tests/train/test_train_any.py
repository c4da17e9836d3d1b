"""``shardflow train`` for any model and data: a user's module and dataset named by import path
(``examples/spirals.toml``) trains equal to the same model in plain PyTorch, evaluates on its validation split
with the loss and accuracy plain PyTorch computes, and resumes bit-identically; batch order is a function of
the seed and the step; configs naming a missing module, function, class or argument fail with the name."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset

from shardflow.testing import run_on_ranks
from shardflow.train import load_config, train
from shardflow.train.data import make_batches
from shardflow.train.models import build_model
from tests.graph.test_compile import reference_step
from tests.train.test_train import ROOT

SPIRALS = str(ROOT / "examples" / "spirals.toml")
sys.path.insert(0, str(ROOT))  # the examples are found from the repository's root, as in a run from there
from examples.spirals import SpiralNet  # noqa: E402


def _run(flags: list[str]) -> tuple[list[float], list[str]]:
    lines: list[str] = []
    losses = train(load_config(SPIRALS, ["--log_every", "1000", *flags]), log=lines.append)
    return losses, lines


def _plain(steps: int, batch: int) -> tuple[list[float], float, float]:
    """The spirals example in plain PyTorch: its losses, then the validation loss and accuracy."""
    torch.manual_seed(0)
    ref = SpiralNet(hidden=64)
    cfg = load_config(SPIRALS)
    batches = make_batches(cfg.data, batch, cfg.seed, None)
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, eps=1e-6, foreach=False)
    stream = batches.train(0)
    losses = [reference_step(ref, opt, *next(stream), clip=cfg.max_grad_norm) for _ in range(steps)]
    held_out = batches.validation(0)
    with torch.no_grad():
        loss = sum(float(F.cross_entropy(ref.predict(x), y)) for x, y in held_out) / len(held_out)
        right = sum(int((ref.predict(x).argmax(-1) == y).sum()) for x, y in held_out)
    return losses, loss, right / sum(len(y) for _, y in held_out)


def test_a_users_model_and_dataset_train_evaluate_and_resume(tmp_path):
    flags = ["--steps", "4", "--eval_every", "4", "--batch_size", "50", "--resume", "never"]
    losses, lines = run_on_ranks(2, _run, [*flags, "--run_dir", str(tmp_path / "a")], timeout=300)[0]
    want, loss, accuracy = _plain(4, 50)
    for g, w in zip(losses, want, strict=True):
        assert abs(g - w) <= 1e-5 + 1e-4 * abs(w), (losses, want)
    (evaluated,) = [line for line in lines if line.startswith("eval at step 4")]
    assert f"loss {loss:.4f}, accuracy {accuracy:.4f} (12 validation batches)" in evaluated, (evaluated, loss, accuracy)
    # resumed from step 2's snapshot: the same losses, bit for bit (batch i is a function of seed and i)
    again = ["--snapshot_every", "2", "--run_dir", str(tmp_path / "b")]
    first = run_on_ranks(2, _run, [*flags, *again, "--steps", "2"], timeout=300)[0][0]
    rest = run_on_ranks(2, _run, [*flags, *again, "--resume", "auto"], timeout=300)[0][0]
    assert first + rest == losses


class _Stream(IterableDataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter([(torch.tensor([float(k)]), torch.tensor(k % 3)) for k in range(self.n)])


def test_batch_i_is_a_function_of_the_seed_and_i():
    cfg = load_config(SPIRALS, ["--data.args.n", "70"])
    data = make_batches(cfg.data, 16, 5, None)
    whole = [x for x, _ in (next(b) for b in [data.train(0)] for _ in range(9))]
    # resumed at step 4 by a fresh reader: the same batches
    later = make_batches(cfg.data, 16, 5, None).train(4)
    for i in range(4, 9):
        assert torch.equal(next(later)[0], whole[i])
    # every sample once per epoch (70 samples: the 5th batch ends epoch 0 and begins epoch 1), another order next
    drawn = torch.cat(whole)[:70]
    assert len({tuple(p.tolist()) for p in drawn}) == 70
    assert not torch.equal(torch.cat(whole)[70:140], drawn)
    other = make_batches(cfg.data, 16, 6, None).train(0)
    assert not torch.equal(next(other)[0], whole[0])  # another seed, another order
    # an iterable dataset is read in order and skipped ahead on resume, across its passes
    from shardflow.train.data import StreamBatches

    stream = StreamBatches(_Stream(5), lambda: _Stream(7), 2, 0, torch.utils.data.default_collate)
    assert next(stream.train(3))[0].flatten().tolist() == [1.0, 2.0]  # samples 6, 7 of a 5-sample stream
    assert [x.flatten().tolist() for x, _ in stream.validation(0)] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]


def _missing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "mine.py").write_text("import torch\ndef build(width):\n    return torch.nn.Linear(width, 1)\n")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model.function", "examples.nothere:build"], "no module named 'examples.nothere'"),
        (["--model.function", "examples.spirals:bulid"], "module 'examples.spirals' has no attribute 'bulid'"),
        (["--model.function", "examples.spirals"], "expected 'package.module:function'"),
        (["--model.args.hiden", "3"], "model.args: build cannot take these arguments"),
        (["--model.builtin", "gpt", "--model.function", "examples.spirals:build"],
         "names builtin = 'gpt' and function = 'examples.spirals:build': give one"),
        (["--model.hf", "LlamaForCausalLM", "--model.args.hiden_size", "8"],
         "unknown key 'model.args.hiden_size': LlamaConfig has no such setting"),
        (["--model.hf", "LlamaForCausaLM"], "transformers has no model class"),
        (["--model.hf", "LlamaModel"], "shardflow trains *ForCausalLM"),
        (["--model.builtin", "bert"], "shardflow ships ['gpt', 'dlrm']"),
        (["--model.weights", "w/"], "model.weights loads a Hugging Face model's weights: set model.hf too"),
    ],
)  # fmt: skip
def test_a_config_naming_what_is_not_there_says_so(flags, message):
    with pytest.raises(ValueError) as e:
        # the Hugging Face and built-in cases start from no config (the spirals' [model.args] are not theirs)
        cfg = load_config(None if "--model.hf" in flags or "bert" in flags else SPIRALS, flags)
        build_model(cfg.model, 0)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data.function", "examples.spirals:pionts"], "has no attribute 'pionts'"),
        (["--data.args.size", "3"], "data.args: points cannot take these arguments"),
        (["--data.collate", "builtins:dict"], "a collated batch is the model's inputs"),
        (["--data.function", "", "--data.args", "{seq_len = 0}"], "data.args.seq_len must be a positive int"),
        (["--metric", "auroc"], "metric = 'auroc': 'accuracy' and 'auc' are built in"),
        (["--metric_method", "forward"], "metric = 'accuracy' reads a method's scores per class, not the loss"),
        (["--metric", "examples.spirals:auc"], "has no attribute 'auc'"),
        (["--mesh", "2,1", "--axes", "pp,dp"], "a pipelined model evaluates its forward (the loss) only"),
        (["--data.args", "{n = 200}", "--eval_every", "1"], "the validation split has no full batch of 64 samples"),
    ],
)
def test_data_and_metric_errors_name_the_key(flags, message):
    from shardflow.testing.ranks import RankError
    from shardflow.train.evaluation import metric_of

    with pytest.raises((ValueError, RankError)) as e:
        cfg = load_config(SPIRALS, flags)
        metric_of(cfg)
        data = make_batches(cfg.data, 64, 0, None)
        next(data.train(0))
        if not data.validation(cfg.eval_batches):  # what the loop says before its first step
            run_on_ranks(1, _run, [*flags, "--mesh", "1"], timeout=120)
    assert message in str(e.value)


def test_hugging_face_classifiers_and_causal_lms_build_from_their_config():
    import transformers

    small = {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    small |= {"num_attention_heads": 2, "max_position_embeddings": 12}
    x = torch.randint(1, 40, (3, 12))
    with pytest.raises(ValueError, match="pools the last non-padding token: set model.args.pad_token_id"):
        build_model(load_config(None, ["--model.hf", "LlamaForSequenceClassification"]).model, 0)
    args = str(small | {"num_labels": 3, "pad_token_id": 0}).replace(":", " =").replace("'", "")
    built = build_model(
        load_config(None, ["--model.hf", "LlamaForSequenceClassification", "--model.args", args]).model, 0
    )
    torch.manual_seed(0)
    plain = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**small, num_labels=3, pad_token_id=0))
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        assert torch.equal(built.module.predict(x), plain(input_ids=x).logits)
        torch.testing.assert_close(built.module(x, labels), F.cross_entropy(plain(input_ids=x).logits, labels))
    args = str(small).replace(":", " =").replace("'", "")
    lm = build_model(load_config(None, ["--model.hf", "LlamaForCausalLM", "--model.args", args]).model, 0)
    assert lm.context == 12
    torch.manual_seed(0)
    plain_lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))
    y = torch.roll(x, -1, 1)
    with torch.no_grad():  # the wrapper's loss is the next-token cross-entropy HF computes from labels = x
        want = plain_lm(input_ids=x, labels=x).loss
        logits = plain_lm(input_ids=x).logits
        torch.testing.assert_close(lm.module(x, y), F.cross_entropy(logits.flatten(0, 1), y.flatten()))
        torch.testing.assert_close(lm.module(x[:, :-1], x[:, 1:]), want)


def _llama_losses(flags: list[str]) -> list[float]:
    return train(load_config(str(ROOT / "examples" / "hf_llama.toml"), flags), log=lambda _: None)


def test_the_hugging_face_llama_example_trains_like_plain_pytorch(tmp_path):
    """examples/hf_llama.toml on its 2x2 (dp, tp) mesh: the first steps' losses equal those of the same
    LlamaForCausalLM, built from transformers directly, trained in plain PyTorch on the same batches."""
    import transformers

    steps = 3
    flags = ["--steps", str(steps), "--run_dir", str(tmp_path / "run"), "--resume", "never", "--eval_every", "0"]
    got = run_on_ranks(4, _llama_losses, flags, timeout=300)[0]
    cfg = load_config(str(ROOT / "examples" / "hf_llama.toml"), flags)
    torch.manual_seed(cfg.seed)
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.model.args))
    opt = torch.optim.AdamW(plain.parameters(), lr=cfg.lr, eps=1e-6, foreach=False)
    batches = make_batches(cfg.data, cfg.batch_size, cfg.seed, cfg.model.args["max_position_embeddings"]).train(0)
    want = []
    for _ in range(steps):
        x, y = next(batches)
        loss = F.cross_entropy(plain(input_ids=x).logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.max_grad_norm, foreach=False)
        opt.step()
        want.append(loss.item())
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= 1e-5 + 1e-4 * abs(w), (got, want)
