"""Press HTTP server: the OpenAI-compatible front end over the diffusion engine."""
