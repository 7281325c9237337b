"""Text-overlap metrics shared by the evaluators (``eval/convai2.py``, ``eval/generic.py``), all x100.

* :func:`corpus_bleu`: corpus BLEU with sacrebleu, 13a tokens, 4-grams, no smoothing, brevity penalty; equal to the
  tensorflow-nmt ``compute_bleu`` that ``evaluate``'s bleu runs, for single references (tests/test_eval_rules.py);
* :func:`rouge_l`: the mean ROUGE-L F of rouge-score (default tokenizer, no stemmer), best reference per example.
"""

from __future__ import annotations


def corpus_bleu(preds: list[str], refs: list[list[str]]) -> float:
    """Corpus BLEU x100: 13a tokens, 4-grams, no smoothing (any zero n-gram precision gives 0), brevity penalty."""
    import sacrebleu

    k = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(k)]
    return sacrebleu.corpus_bleu(preds, streams, tokenize="13a", smooth_method="none", force=True).score


def rouge_l(preds: list[str], refs: list[list[str]]) -> float:
    """Mean ROUGE-L F x100 (rouge-score default tokenizer, no stemmer; best reference when there are several)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score_multi(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    return 100.0 * sum(scores) / len(scores)
