"""Who is asking and what they may do: grants and roles, GitHub, pulsar-rest's own tokens,
and the identities they make. Knows nothing of this service's HTTP routes."""
