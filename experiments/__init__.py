"""The experiment harness: the paper's tables as data, runs keyed by config hash, reports and checks.

    python -m experiments.run table1c --scale smoke       # run (cached jobs are skipped), then report
    python -m experiments.check table1c --scale smoke     # exit 0 pass, 1 regression, 2 missing
"""
