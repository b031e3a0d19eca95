"""lm-eval task templates for the local tasks (rendered at run time by ``lm_eval_suite``)."""
