"""Evaluation, in two layers.

Scoring library (below train: training's callbacks call it; it never imports train):
    metrics.py     scores over generated text: pure functions of (predictions, references)
    generation.py  one set's conversations: prompt -> generate -> score; which settings apply to a set
    plots.py       RUN/loss.png (written by training) and the report's figures

Command side (`llamaft eval`, the report; reads run directories, uses the library):
    evaluate.py    loss + generation metrics of a trained model, optionally against its base
    report.py      RUN/report.md from what a run directory holds
"""
