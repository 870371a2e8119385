"""`eglo api`: the HTTP face of eglo (FastAPI, OpenAPI 3.1 generated from the code).

Submitting publishes the AMQP request, with the same contract and the same strictness; reading
goes to the same database the workers write. See the README's "HTTP API" section.
"""
