"""Images in prompts: loading them (media), turning them into placeholder tokens and pixel values
(processor), and the engine-side record of each image (inputs)."""
