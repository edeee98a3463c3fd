"""Sans-IO wire formats: Server-Sent Events framing and OpenAI's shapes.

Nothing in this package touches a socket; everything is tested with bytes.
"""
