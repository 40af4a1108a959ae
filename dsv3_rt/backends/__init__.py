"""Built-in backends, each in its own folder and registered through the same hook as third-party ones."""
