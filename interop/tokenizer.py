"""The tokenizer files of an exported folder: what `AutoTokenizer.from_pretrained(folder)` loads offline and
encodes exactly as the project's tokenizer does.

A sentencepiece BPE model (data/tokenizer.py trains one) becomes a `tokenizers` BPE with the same pieces, merges
and byte fallback, the sentencepiece file itself kept beside it. transformers' own sentencepiece conversion
(LlamaTokenizer) is not exact for these models: it splits the text at user-defined pieces such as "\\n" and
prepends the "▁" dummy prefix to every part (so "a\\nb" gets "▁b" where sentencepiece gives "b"), and its
Metaspace step adds no prefix to text that starts with a space. Here the prefix goes once in front of the whole
text (a normalizer) and "\\n" is an ordinary piece no merge touches, which is what sentencepiece does.
A Hugging Face tokenizer (data.tokenizer_type=hf) is saved as it is.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

SPIECE_BPE = 2  # sentencepiece's TrainerSpec.model_type of BPE


def write_tokenizer(path: str, tokenizer_type: str, out: Path) -> None:
    """Write the tokenizer `path` (of data.tokenizer_type `tokenizer_type`) into the folder `out`."""
    if tokenizer_type == "hf":
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(path, local_files_only=True).save_pretrained(out)
        return
    _write_sentencepiece(Path(path), out)


def _write_sentencepiece(path: Path, out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(path.read_bytes())
    if proto.trainer_spec.model_type != SPIECE_BPE:
        raise ValueError(f"tokenizer {path} is a sentencepiece model of type {proto.trainer_spec.model_type}; the "
                         "export converts BPE models (scripts/train_tokenizer.py trains those) only")
    if proto.normalizer_spec.name not in ("identity", "") or proto.normalizer_spec.precompiled_charsmap:
        raise ValueError(f"tokenizer {path} normalizes text ({proto.normalizer_spec.name}); the export converts "
                         "sentencepiece models trained with normalization_rule_name=identity only")
    pieces = [p.piece for p in proto.pieces]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    # sentencepiece BPE applies the merge whose result has the best score (the lowest id) first
    merges = sorted(((piece[:i], piece[i:], rank) for rank, piece in enumerate(pieces)
                     for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab),
                    key=lambda m: (m[2], vocab[m[0]], vocab[m[1]]))
    unk = pieces[proto.trainer_spec.unk_id] if proto.trainer_spec.unk_id >= 0 else None
    tok = Tokenizer(models.BPE(vocab, [(a, b) for a, b, _ in merges], unk_token=unk, fuse_unk=True,
                               byte_fallback=proto.trainer_spec.byte_fallback))
    steps = [normalizers.Replace(" ", "▁")]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if proto.normalizer_spec.add_dummy_prefix else []))
    CONTROL = 3  # sentencepiece piece type: <s>, </s> (unk is 2, handled by the model)
    special = {i: pieces[i] for i in (proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id,
                                      proto.trainer_spec.pad_id) if i >= 0}
    special.update({i: p.piece for i, p in enumerate(proto.pieces) if p.type == CONTROL})
    tok.add_special_tokens([AddedToken(piece, special=True, normalized=False) for _, piece in sorted(special.items())])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    shutil.copyfile(path, out / "tokenizer.model")
    spec = proto.trainer_spec
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False, "model_max_length": 1 << 30}
    for key, i in (("unk_token", spec.unk_id), ("bos_token", spec.bos_id), ("eos_token", spec.eos_id),
                   ("pad_token", spec.pad_id)):
        if i >= 0:
            config[key] = pieces[i]
    config.setdefault("pad_token", config.get("eos_token"))  # batched generation pads; sentencepiece has no pad
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
