"""Media and text tokenizers: they turn raw text, images and speech into codes and back."""
