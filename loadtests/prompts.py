"""The load tests' own prose prompts (for throughput and eps_online; `run` takes --dataset FILE).

A load tester needs text, not the server's internals: these are written for the
load tests (a mix of chat, code, lists and numbers, so that a real model's
routing sees varied tokens), independent of the prompts `--smooth-eps auto`
calibrates on.
"""

PROSE_PROMPTS = [
    "Give three tips for keeping houseplants alive through a dry winter.",
    "Write a limerick about a cat who learns to use a keyboard.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "List the planets of the solar system in order from the sun, with one fact about each.",
    "Translate to German: Please close the window before you leave the meeting room.",
    "How does a hash map handle two keys that land in the same bucket?",
    "User: Can you suggest a name for a bakery that only sells bread?\nAssistant:",
    "UPDATE inventory SET quantity = quantity - 3 WHERE sku = 'A-1042' AND warehouse = 'north';",
    "Steps to change a bicycle tyre: remove the wheel, let out the air, lever off the tyre,",
    "Sales rose from 820 units in March to 1,140 in April; what is the percentage increase?",
    "Explain to a new employee what a code review is for and how to give useful comments.",
    "Tell me about the history of the printing press in two paragraphs.",
    "Compose a polite email declining an invitation to speak at a conference next spring.",
    "What are the trade-offs between renting and buying a home for someone who moves often?",
    "Describe how bees communicate the location of flowers to the rest of the hive.",
    "Write a haiku about the first snow falling on a quiet city street.",
]

