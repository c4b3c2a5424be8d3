"""Hugging Face models through the command line, against transformers + peft (torch, CPU): a tiny random Llama
with real-style BPE tokenizers of both kinds, one whose rule adds BOS and one (a chat model's) that adds
nothing. `jaxllm generate` / `jaxllm eval` must tokenize, decode and stop exactly as transformers does."""

import json
import shutil

import pytest

torch = pytest.importorskip("torch", reason="HF CLI parity needs the [hf] extra")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from cli_process import jaxllm_process  # noqa: E402
from conftest import FAST_COMPILE  # noqa: E402
from jaxllm.cli import main  # noqa: E402
from jaxllm.data.sft import ChatEncoder  # noqa: E402
from jaxllm.data.tokenizer import HFTokenizer  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
KINDS = {  # special tokens, whether the tokenizer.json post-processor adds BOS, tokenizer_config.json
    "adds_bos": (["<s>", "</s>"], True, {"bos_token": "<s>", "eos_token": "</s>", "chat_template": BOS_TEMPLATE}),
    "no_bos": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], False,
               {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML}),
}
TEXT = ["The quick brown fox jumps over the lazy dog.", "def add(x, y):\n    return x + y  # café",
        "Hello world, this is a test of the tokenizer.", "Pack my box with five dozen liquor jugs!"]
PROMPT = "The quick brown"
VOCAB = 320


def _tokenizer(directory, kind):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, adds_bos, config = KINDS[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> HF directory: one random Llama saved beside each kind of tokenizer."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    dirs = {}
    for kind in KINDS:
        d = tmp_path_factory.mktemp(kind)
        model.save_pretrained(d, safe_serialization=True)
        tok = _tokenizer(d, kind)
        if kind == "no_bos":  # an instruct model: generation stops at its end of turn
            (d / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.token_to_id("<|im_end|>")}))
        dirs[kind] = d
    return dirs


def _hf(directory):
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    return tok, model


def _hf_greedy(model, ids, max_new_tokens, stop_id):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_id, pad_token_id=stop_id)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cli_generate_tokenizes_like_transformers(models, kind):
    """The CLI (its own process), `generate()` and transformers give the same greedy text from the same prompt."""
    from jaxllm.generate import generate
    from jaxllm.interop.models import load_model

    hf_tok, model = _hf(models[kind])
    ids = hf_tok(PROMPT)["input_ids"]
    assert (ids[0] == hf_tok.bos_token_id) == KINDS[kind][1]  # the two kinds differ in exactly this
    new = _hf_greedy(model, ids, 16, hf_tok.eos_token_id)
    assert len(new) == 16  # no early stop: the comparison covers every token

    ours = load_model(models[kind])
    assert ours.tokenizer.encode(PROMPT, add_special_tokens=True) == ids
    assert generate(ours.lm, ours.params, [ids], 16, stop_ids=ours.tokenizer.stop_ids) == [new]
    out = jaxllm_process("generate", "--model", str(models[kind]), "--prompt", PROMPT, "--max-new-tokens", "16",
                         xla_flags=FAST_COMPILE)  # what is tested is tokenization, not XLA's optimisation
    assert out == PROMPT + hf_tok.decode(new) + "\n"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cli_eval_equals_transformers_mean_token_loss(models, kind, tmp_path, capsys):
    hf_tok, model = _hf(models[kind])
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    total = count = 0.0
    with torch.no_grad():
        for text in TEXT:
            ids = torch.tensor([hf_tok(text)["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            total -= float(logp.gather(1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    assert main(["eval", "--model", str(models[kind]), "--data", str(tmp_path / "docs.jsonl"), "--seq-len", "64"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens"] == count
    assert abs(result["loss"] - total / count) < 1e-4


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sft_rendering_equals_apply_chat_template(models, kind):
    hf_tok = transformers.AutoTokenizer.from_pretrained(models[kind])
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add x and y."},
            {"role": "assistant", "content": "def add(x, y): return x + y"}, {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "Pack my box, café."}]
    encoder = ChatEncoder(HFTokenizer(models[kind] / "tokenizer.json"), KINDS[kind][2]["chat_template"], max_tokens=512)
    ids, weights = encoder(conv)
    assert ids.tolist() == hf_tok.apply_chat_template(conv, tokenize=True)["input_ids"]
    trained = hf_tok.decode([int(i) for i, w in zip(ids, weights) if w])
    turn_end = "<|im_end|>\n" if kind == "no_bos" else "</s>"
    assert trained == "".join(m["content"] + turn_end for m in conv if m["role"] == "assistant")
    prompt = conv[:2]
    assert encoder.prompt_ids(prompt) == hf_tok.apply_chat_template(prompt, tokenize=True,
                                                                    add_generation_prompt=True)["input_ids"]


def test_adapter_from_peft_through_generate_and_eval(models, tmp_path, capsys):
    """A LoRA adapter made by peft (B nonzero), applied with --adapter: peft's greedy text and loss."""
    hf_tok, base = _hf(models["adds_bos"])
    spec = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(1)
    peft.get_peft_model(base, spec).save_pretrained(tmp_path / "adapter")
    model = peft.PeftModel.from_pretrained(_hf(models["adds_bos"])[1], tmp_path / "adapter").eval()
    ids = hf_tok(PROMPT)["input_ids"]
    new = _hf_greedy(model, ids, 16, hf_tok.eos_token_id)
    assert new != _hf_greedy(_hf(models["adds_bos"])[1], ids, 16, hf_tok.eos_token_id)  # the adapter matters
    args = ["--model", str(models["adds_bos"]), "--adapter", str(tmp_path / "adapter")]
    assert main(["generate", *args, "--prompt", PROMPT, "--max-new-tokens", str(len(new))]) == 0
    assert capsys.readouterr().out == PROMPT + hf_tok.decode(new) + "\n"

    (tmp_path / "doc.txt").write_text(TEXT[1])
    doc = torch.tensor([hf_tok(TEXT[1])["input_ids"]])
    with torch.no_grad():
        expected = float(model(input_ids=doc, labels=doc).loss)
    assert main(["eval", *args, "--data", str(tmp_path / "doc.txt"), "--seq-len", "64"]) == 0
    assert abs(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] - expected) < 1e-4


def test_chat_renders_the_template_and_stops_at_the_end_of_turn(models, tmp_path, capsys):
    """--chat / --messages answer through the chat template and stop at <|im_end|> (the generation config's
    eos_token_id), as transformers does: here a model whose head favours <|im_end|> once its answer begins."""
    chat_dir = tmp_path / "chat"
    shutil.copytree(models["no_bos"], chat_dir)
    hf_tok, model = _hf(chat_dir)
    end = hf_tok.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    free = _hf_greedy(model, ids, 24, None)
    with torch.no_grad():  # <|im_end|>'s output row: 1.5x that of the 6th token generated without it
        model.lm_head.weight[end] = 1.5 * model.lm_head.weight[free[5]]
    model.save_pretrained(chat_dir, safe_serialization=True)
    new = _hf_greedy(model, ids, 24, end)
    assert new[-1] == end and 1 < len(new) < 24, new  # stopped at the end of turn, after some text
    expected = hf_tok.decode(new[:-1]) + "\n"

    (tmp_path / "messages.json").write_text(json.dumps(messages))
    assert main(["generate", "--model", str(chat_dir), "--messages", str(tmp_path / "messages.json"),
                 "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out == expected
    (tmp_path / "user.json").write_text(json.dumps({"messages": messages[1:]}))
    user_only = _hf_greedy(model, hf_tok.apply_chat_template(messages[1:], tokenize=True, add_generation_prompt=True)
                           ["input_ids"], 24, end)
    assert main(["generate", "--model", str(chat_dir), "--chat", "--prompt", PROMPT, "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out == hf_tok.decode([t for t in user_only if t != end]) + "\n"


def test_generate_input_errors(models, tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps([{"role": "robot", "content": "hi"}]))
    cases = [(["--messages", str(tmp_path / "bad.json")], "each message needs a role"),
             (["--messages", str(tmp_path / "missing.json")], "--messages"),
             ([], "give --prompt TEXT or --messages FILE"),
             (["--prompt", "x", "--adapter", str(tmp_path)], "no adapter_config.json")]
    for extra, message in cases:
        assert main(["generate", "--model", str(models["no_bos"]), *extra]) == 2
        assert message in capsys.readouterr().err
    shutil.copytree(models["no_bos"], tmp_path / "plain")
    (tmp_path / "plain" / "tokenizer_config.json").write_text("{}")
    assert main(["generate", "--model", str(tmp_path / "plain"), "--chat", "--prompt", "x"]) == 2
    assert "no chat_template" in capsys.readouterr().err


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_lm_eval_and_pretraining_tokenize_like_transformers(models, kind):
    """The lm-eval adapter scores contexts as transformers tokenizes them; continued pretraining reads a
    document as transformers tokenizes it, then EOS (where the model learns that text ends)."""
    pytest.importorskip("lm_eval")
    from jaxllm.data.pipeline import text_encoder
    from jaxllm.interop.lm_eval_adapter import JaxLLMEvalModel

    hf_tok = transformers.AutoTokenizer.from_pretrained(models[kind])
    ids = hf_tok(TEXT[1])["input_ids"]
    assert JaxLLMEvalModel(pretrained=str(models[kind]))._context_ids(TEXT[1]) == ids
    tokens, weights = text_encoder(HFTokenizer(models[kind] / "tokenizer.json"))(TEXT[1])
    assert tokens.tolist() == ids + [hf_tok.eos_token_id] and weights.tolist() == [1.0] * (len(ids) + 1)
