"""Run llama.cpp's own convert_hf_to_gguf.py on a model folder, for bench/llamacpp.py.

    python bench/gguf_convert.py LLAMA_CPP_DIR MODEL_DIR --outtype q8_0 --outfile OUT.gguf

Two things the converter refuses for the benchmark's model are let through, and nothing else
changes: the benchmark's tokenizer is a synthetic byte-level BPE (GPT-2's pre-tokenizer, whose
hash llama.cpp's table does not know; "gpt2" itself is not a name its loader accepts), and the
converter tries sentencepiece first, which a folder without tokenizer.model does not need. A
real Hugging Face folder converts as upstream converts it.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _patch(root: Path) -> None:
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    from conversion import base  # llama.cpp's package, next to convert_hf_to_gguf.py

    sentencepiece = base.TextModel._set_vocab_sentencepiece
    vocab_pre = base.TextModel.get_vocab_base_pre

    def set_vocab_sentencepiece(self, *args, **kwargs):
        if not (self.dir_model / "tokenizer.model").is_file():
            raise FileNotFoundError("no tokenizer.model")  # the converter then tries the next
        return sentencepiece(self, *args, **kwargs)

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return vocab_pre(self, tokenizer)
        except NotImplementedError:  # an unknown hash: ours is plain GPT-2 byte-level BPE,
            return "mellum"  # a name llama.cpp's loader maps to GPT-2's pre-tokenizer

    base.TextModel._set_vocab_sentencepiece = set_vocab_sentencepiece
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def main() -> None:
    root = Path(sys.argv[1])
    _patch(root)
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
