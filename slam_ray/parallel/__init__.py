"""Ray glue the stages share: actor pools, speak-then-tokenise, NLL scoring actors, the TTS actors, the trainer
scaffold."""
