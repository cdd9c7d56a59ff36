"""Tests for rlhf_ray.models: char tokenizer, tiny Llama build, and the loaders."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlhf_ray.data.task import DEFAULT_TASK
from rlhf_ray.models import (
    DEFAULT_ALPHABET,
    build_char_tokenizer,
    build_tiny_llama,
    check_tokenizer_matches_model,
    ensure_tiny_llama,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    load_value_model,
)
from rlhf_ray.models import load as load_module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=0)


def test_tokenizer_round_trips_every_character() -> None:
    tok = build_char_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.padding_side == "right"
    for ch in DEFAULT_ALPHABET:
        ids = tok(ch)["input_ids"]
        assert len(ids) == 1 and ids[0] >= 4, ch
        assert tok.decode(ids) == ch
    # Whole strings, spaces and newlines included: no separator inserted, no BOS/EOS added.
    text = "rev abc=cba\n  x: 1 > 0, y = 'z'!"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    # Generated ids ending in EOS + pads decode back to the exact answer.
    assert tok.decode(tok("cba")["input_ids"] + [tok.eos_token_id, 0, 0], skip_special_tokens=True) == "cba"
    # Unknown characters map to <unk>.
    assert tok("é")["input_ids"] == [tok.unk_token_id]


def test_default_alphabet_covers_the_task() -> None:
    spec = DEFAULT_TASK
    needed = set(spec.alphabet + spec.prompt_prefix + spec.prompt_suffix)
    assert needed <= set(DEFAULT_ALPHABET)


def test_build_reload_and_loss(model_dir: Path) -> None:
    files = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= files
    weights = [p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)

    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32
    assert model.config.vocab_size % 8 == 0 and model.config.vocab_size >= len(tok)
    assert not model.config.tie_word_embeddings
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    n_params = sum(p.numel() for p in model.parameters())
    assert 500_000 < n_params < 5_000_000, n_params  # ~1.1 M with the defaults

    ids = torch.tensor([tok("rev abc=cba")["input_ids"] + [tok.eos_token_id]])
    loss = model(input_ids=ids, labels=ids).loss
    # Random init: loss near ln(vocab) = ln(104) = 4.64.
    assert torch.isfinite(loss) and 3.5 < loss.item() < 6.0
    check_tokenizer_matches_model(tok, model.config, "policy")


def test_build_is_deterministic_and_ensure_is_idempotent(model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_llama(tmp_path / "again", seed=0)
    a, b = load_file(model_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = load_file(build_tiny_llama(tmp_path / "other", seed=1) / "model.safetensors")
    assert not torch.equal(a["model.embed_tokens.weight"], other["model.embed_tokens.weight"])

    mtime = (again / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_llama(again, seed=5) == again  # config.json exists: nothing rebuilt
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime
    built = ensure_tiny_llama(tmp_path / "fresh", hidden_size=32, num_layers=1, num_heads=2)
    assert (built / "config.json").is_file()
    # A cache built before the tokenizer had a chat template is rebuilt, not used as it is.
    (again / "chat_template.jinja").unlink()
    ensure_tiny_llama(again, seed=5)
    assert load_tokenizer(again).chat_template and (again / "model.safetensors").stat().st_mtime_ns != mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no build dirs left over


def test_value_and_reward_models_shapes(model_dir: Path) -> None:
    tok = load_tokenizer(model_dir)
    batch = tok(["rev abc=cba", "rev abcdef=fedcba"], padding=True, return_tensors="pt")

    critic = load_value_model(model_dir)
    values = critic(**batch).logits
    assert values.shape == (2, batch["input_ids"].shape[1], 1)
    # Fresh head is zero: V = 0 everywhere at the start.
    assert torch.count_nonzero(values) == 0
    assert critic.config.classifier_dropout == 0.0

    reward = load_reward_model(model_dir)
    assert reward.config.pad_token_id == tok.pad_token_id
    scores = reward(**batch).logits
    assert scores.shape == (2, 1)
    # The score is read at the last non-pad token: the padded short row equals itself unpadded.
    alone = reward(**tok(["rev abc=cba"], return_tensors="pt")).logits
    torch.testing.assert_close(scores[0], alone[0])


def test_value_model_takes_head_from_reward_checkpoint(model_dir: Path, tmp_path: Path) -> None:
    reward = load_reward_model(model_dir)
    reward.save_pretrained(tmp_path / "rm")
    critic = load_value_model(tmp_path / "rm")
    torch.testing.assert_close(critic.score.weight, reward.score.weight)
    assert torch.count_nonzero(critic.score.bias) == 0


def test_loaders_never_trust_remote_code_nor_pickle(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict] = []
    for auto in (
        "AutoModelForCausalLM",
        "AutoModelForTokenClassification",
        "AutoModelForSequenceClassification",
    ):
        cls = getattr(load_module, auto)
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_causal_lm(model_dir)
    load_value_model(model_dir)
    load_reward_model(model_dir)
    assert len(seen) == 3
    assert all(kw["trust_remote_code"] is False and kw["use_safetensors"] is True for kw in seen)


def test_pickle_only_checkpoint_is_refused(model_dir: Path, tmp_path: Path) -> None:
    model = load_causal_lm(model_dir)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \.safetensors weights.*pytorch_model\.bin"):
        load_causal_lm(tmp_path)


def test_check_tokenizer_matches_model_raises_on_mismatch(model_dir: Path) -> None:
    model = load_causal_lm(model_dir)
    small = build_char_tokenizer("abc")  # fits: 7 ids < 104 rows
    check_tokenizer_matches_model(small, model.config, "policy")
    big = build_char_tokenizer(DEFAULT_ALPHABET + "".join(chr(0x400 + i) for i in range(40)))
    with pytest.raises(ValueError, match="policy:.*ids go up to 139 but the model has 104 embedding rows"):
        check_tokenizer_matches_model(big, model.config, "policy")
    no_pad = build_char_tokenizer("abc")
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad_token_id"):
        check_tokenizer_matches_model(no_pad, model.config, "reward")


def test_other_architecture_loads_through_same_functions(tmp_path: Path) -> None:
    # Stands in for a real Qwen checkpoint: a tiny Qwen2 whose tokenizer has no pad token.
    tok = build_char_tokenizer("abc =")
    tok.pad_token = None
    config = Qwen2Config(
        vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    loaded_tok = load_tokenizer(tmp_path)
    assert loaded_tok.pad_token_id == loaded_tok.eos_token_id  # pad falls back to EOS
    assert isinstance(load_causal_lm(tmp_path), Qwen2ForCausalLM)
    ids = torch.tensor([loaded_tok("ab=ba")["input_ids"]])
    assert load_value_model(tmp_path)(input_ids=ids).logits.shape == (1, 5, 1)
    reward = load_reward_model(tmp_path)
    assert reward.config.pad_token_id == loaded_tok.eos_token_id
    assert reward(input_ids=ids).logits.shape == (1, 1)
