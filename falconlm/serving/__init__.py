"""The HTTP-free serving layer that the server and the batch runner share: OpenAI protocol models, the serving
classes that turn a request into engine calls and a typed response (or typed chunks), and typed errors.

``falconlm.server`` sends what these return over HTTP; ``falconlm.batch`` writes it as output lines. Neither
imports the other; ``falconlm.cli.serve_http`` composes them into one app.
"""
