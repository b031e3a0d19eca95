"""Evaluation: the GSM8K k-shot CoT eval (``gsm8k_eval``) and the lm-eval regression suite
(``lm_eval_suite``), both spread over devices in spawned processes (``parallel``)."""
