"""What training and evaluation share, built from the resolved config: the model and tokenizer
(model_setup), a stage's data stream (stage_data), the loss module (lm, loss), checkpoint files
(checkpoint_files) and the checks before any weight is loaded (preflight). Below both trainer/ and eval/."""
