"""Teachers: turn data rows into trace rows (prompt, response, correctness) for SFT.

``gold`` rewrites the reference solutions into the prompt style's response format; the API and
local-model teachers sample responses and grade them against the gold answer.
"""
