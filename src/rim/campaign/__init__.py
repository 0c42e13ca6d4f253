"""Campaigns: every method x seed of one or more tasks trained as concurrent processes on one device, sized by a
calibration run in the same command, cut at a hard deadline, packed into a few files, reported as tables.

    rim campaign configs/campaign/gsm8k-smollm2.yaml --out $OUT            # the GPU run
    rim campaign configs/campaign/gsm8k-smollm2.yaml --smoke --out /tmp/o  # the CPU rehearsal of the same path
    rim campaign --report /tmp/o                                           # tables from the packed files

Modules: ``spec`` (the YAML spec and its jobs), ``plan`` (calibration numbers -> concurrency and step budget),
``run`` (calibrate, schedule, time, pack), ``worker`` (the subprocess entry points), ``report`` (the tables),
``transport`` (a weights file split into parts for a machine that takes 64 MiB a call).
"""
