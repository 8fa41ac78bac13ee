"""The weight-sharing quantized supernet over a diffusers denoiser. Filled in by the supernet issue."""
