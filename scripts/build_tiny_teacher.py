"""Build the tiny random Llama teacher used by the fast real-vLLM tests.

The output (about 0.6 MB) is committed under ``tests/data/tiny-llama``: the tokenizer is trained
on this Python's stdlib docstrings, so rebuilding on another Python gives different files. Run
this only to change the model on purpose:

    .venv/bin/python scripts/build_tiny_teacher.py tests/data/tiny-llama

The tokenizer's alphabet is restricted to printable ASCII plus newline and tab, so any token
sequence the random model samples decodes to valid UTF-8 (tests compare decoded ids to text).
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def stdlib_docstrings(limit_chars: int = 1_500_000) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                doc = ast.get_docstring(node)
                if doc and doc.isascii():
                    out.append(doc)
                    total += len(doc)
        if total > limit_chars:
            break
    return out


def main(dest: str) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    target = Path(dest)
    target.mkdir(parents=True, exist_ok=True)

    byte_map = pre_tokenizers.ByteLevel.alphabet()  # the 256 byte-level symbols
    ascii_symbols = [s for s in sorted(byte_map) if len(s.encode("utf-8")) == 1 and s.isprintable()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIALS,
        initial_alphabet=[*ascii_symbols, "Ċ", "ĉ"],  # byte-level symbols of "\n" and "\t"
        limit_alphabet=len(ascii_symbols) + 2,
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_docstrings(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(target)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        head_dim=32,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=fast.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(target, safe_serialization=True)
    print(f"tiny teacher written to {target} (vocab {config.vocab_size})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/tiny-llama")
