"""What the commands share: options, the session setup, model opening, the console, the guard, caption's fleet."""
