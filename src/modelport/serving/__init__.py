"""Serving pieces shared by the model repository (Triton) and TorchServe frontends."""
