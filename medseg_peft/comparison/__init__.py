"""The pieces of ``python -m medseg_peft.compare`` (the command itself is :mod:`medseg_peft.compare`).

``inputs`` checks the command's arguments, ``plan`` decides each method's run, ``run_metrics`` reads a run
folder and ``table`` turns the finished runs into the comparison. MONAI loads only when a plan is made and
matplotlib only when a chart is drawn, so ``--collect`` and ``--help`` stay quick.
"""
