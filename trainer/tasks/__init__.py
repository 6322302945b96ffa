"""The four training tasks (pretrain, teacher, RPN, detector transfer): each supplies a model, data and a step."""
