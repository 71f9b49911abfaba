"""Forward passes that parity checks compare: reference models and the runtimes that run them."""
