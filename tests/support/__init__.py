"""What the tests share: harnesses, stub servers, factories. Test modules import from here only."""
