"""Ray actors: thin wrappers that build heavy objects (engines, envs) from plain config inside the actor."""
