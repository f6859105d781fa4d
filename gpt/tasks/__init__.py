"""Task fine-tuning as in GPT-1 (Radford et al. 2018): one pretrained model adapted to
classification, entailment, similarity and multiple choice by changing its input, not its
architecture.

An item becomes one or more token rows framed by three special tokens appended after the
tokenizer's vocabulary (start, delim, extract; figure 1 of the paper):

    classify   start text extract
    entail     start premise delim hypothesis extract
    similar    start a delim b extract  and  start b delim a extract   (final states added)
    choice     start context delim choice_k extract, one row per choice (softmax over them)

A linear head reads the final hidden state at the extract token. Training minimises the
task's cross-entropy plus `lm_weight` times the language-modelling loss on the task text.

`items` reads task files (the one reader of multiple-choice files, which `gpt eval --task`
also uses), `framing` turns items into token rows and batches, `model` is the head and the
model trained around the GPT. The training loop is `gpt.training.loop`'s (the objective in
`gpt.training.objectives`); `gpt classify` is `gpt.inference.classify`.
"""
