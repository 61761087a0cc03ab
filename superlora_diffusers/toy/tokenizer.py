"""Build the real OpenAI CLIP BPE tokenizer offline.

The BPE merges file ships inside the ``open_clip_torch`` wheel (MIT licence) as
``open_clip/bpe_simple_vocab_16e6.txt.gz``.  We locate it with ``importlib.util.find_spec``
(importing open_clip itself would need torchvision) and rebuild the 49,408-token vocabulary
exactly as OpenAI's ``simple_tokenizer.py`` does.  The result is saved inside the shipped model
folder (``assets/base/tokenizer``), so the folder is self-contained and nothing here is needed at
run time.  ``pip install --no-deps open_clip_torch`` is only needed to (re)build it.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from functools import lru_cache


@lru_cache()
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def byte_level_tokenizer(model_max_length: int = 77):
    """A CLIP tokenizer with a byte-level vocabulary and no merges (every word spelt out): tiny, offline, and
    enough for randomly initialised test and benchmark models that never need real BPE."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[], model_max_length=model_max_length,
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                         pad_token="<|endoftext|>")


def find_bpe_file() -> str:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is needed to rebuild the tokenizer: pip install --no-deps open_clip_torch")
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return path


def build_clip_tokenizer(bpe_path: str | None = None):
    """Return a ``transformers.CLIPTokenizer`` with the real CLIP vocabulary (49,408 tokens)."""
    from transformers import CLIPTokenizer

    bpe_path = bpe_path or find_bpe_file()
    merges_txt = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges_txt = merges_txt[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges_txt]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    tok = CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        merges=merges,
        model_max_length=77,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    return tok


def save_clip_tokenizer(folder: str) -> None:
    tok = build_clip_tokenizer()
    tok.save_pretrained(folder)


if __name__ == "__main__":  # pragma: no cover
    import sys

    t = build_clip_tokenizer()
    print(t("a photo of a cat").input_ids, t("sks").input_ids)
    if len(sys.argv) > 1:
        save_clip_tokenizer(sys.argv[1])
