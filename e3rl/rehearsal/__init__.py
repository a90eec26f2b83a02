"""Rehearsal: run any config end to end at toy size on the machine at hand (`python -m e3rl.run
CONFIG --rehearse`), before spending GPU hours on it.

The config runs as written except what size and device decide. One function derives the changes
(`plan.rehearsal_config`), never per config; `standins` writes what a laptop lacks (a tiny random
model of the same architecture, a tokenizer with the same chat-template features, data files in the
real schemas); `runner` runs it (2 steps, a checkpoint, a resume, evaluation, export, report) and
checks that it exercised the path (`checks`).
"""
