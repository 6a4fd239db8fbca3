"""edgevlm runtime: model store and registry, backends, media input, chat sessions, hardware probe.

Nothing in this package prints or exits; long work reports through ``on_progress(stage, done, total)``.
"""
