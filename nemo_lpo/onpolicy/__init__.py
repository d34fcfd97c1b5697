"""On-policy lists: sample K responses per prompt from the policy, score them, train LPO on them, round after round.

``generate`` samples, ``score`` rewards, ``iterate`` runs generate -> score -> pack -> ref-logps -> train -> export.
"""
