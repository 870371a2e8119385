"""The pure core: decisions about requests and results, with no I/O (asyncio, AMQP, SQL, HTTP)."""
