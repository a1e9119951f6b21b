"""LLM-judge evaluation (``aligndistil judge``): answers, judging, statistics and report.

* :mod:`~aligndistil.workflows.judge.questions`: MT-Bench and other question sets;
* :mod:`~aligndistil.workflows.judge.answers`: the compared models' answers, cached;
* :mod:`~aligndistil.workflows.judge.client`: any OpenAI-compatible server, with retries and a cache;
* :mod:`~aligndistil.workflows.judge.grading`: single grades, pairwise verdicts, the judge-free pairing;
* :mod:`~aligndistil.workflows.judge.stats`: win rates and the length-controlled win rate;
* :mod:`~aligndistil.workflows.judge.report`: results.json, results.md, win_rates.png;
* :mod:`~aligndistil.workflows.judge.run`: :func:`run_judge`, the whole run;
* :mod:`~aligndistil.workflows.judge.command`: the command line.

Nothing is imported here, so that building the CLI's parser stays cheap.
"""
