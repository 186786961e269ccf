"""Pure OpenAI wire helpers and token counting."""
