"""Per-layer error of a distilled model against its softmax teacher at 128 and 512 tokens.

For held-out and training text packed to each length (32 passages), the mean-pooled
embedding cosine (mean, min) and every layer's relative squared hidden-state error
|h_student - h_teacher|^2 / |h_teacher|^2 (real tokens; packed passages have none padded).

``python -m benchmarks.hf_distill_layers DIR [--model minilm] [--length 128 --length 512]``
(DIR: what ``favor distill`` saved; one thread; needs the extra ``hf-models``).
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory", help="a distilled model (favor.hf.from_pretrained)")
    p.add_argument("--model", default="minilm", help="its softmax teacher (default minilm)")
    p.add_argument("--length", type=int, action="append", help="tokens per passage (default 128 and 512)")
    p.add_argument("--passages", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import favor.hf as fh
    from favor.hf.fidelity import mean_pool, packed_texts, split_texts, tokenize_batches
    from favor.hf.models import load_softmax

    teacher, tok, kind = load_softmax(args.model)
    student = fh.from_pretrained(args.directory)
    teacher.eval()
    student.eval()
    teacher.set_attn_implementation("sdpa")
    student.set_attn_implementation(fh.NAME)
    for split in ("heldout", "train"):
        for length in args.length or [128, 512]:
            packed = packed_texts(tok, split_texts(split, kind), length=length)
            packed = packed[: args.passages] if split == "heldout" else packed[-args.passages :]
            errs, cos = 0.0, []
            batches = tokenize_batches(tok, packed, batch_size=8, max_length=length)
            with torch.no_grad():
                for b in batches:
                    t = teacher(**b, output_hidden_states=True).hidden_states[1:]
                    s = student(**b, output_hidden_states=True).hidden_states[1:]
                    keep = b["attention_mask"].bool()
                    errs = errs + torch.stack(
                        [((si - ti) ** 2).mean() / (ti**2).mean() for si, ti in zip(s, t, strict=True)]
                    )
                    cos.append((mean_pool(s[-1], keep) * mean_pool(t[-1], keep)).sum(-1))
            cos = torch.cat(cos)
            layers = " ".join(f"{float(e) / len(batches):.4f}" for e in errs)
            print(f"{split} {length} tokens: cosine {cos.mean():.4f} (min {cos.min():.4f}); error per layer {layers}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
