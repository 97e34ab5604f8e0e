"""The built-in calibration prompts for --smooth-eps auto.

Varied on purpose (prose, instructions, code, numbers, dialogue, lists, other
languages): eps is fitted to the router-score margins these tokens produce, so
they should look like what a chat/completions server sees. `smoothsmoe
calibrate --prompts FILE` fits eps on your own traffic instead.
"""

CALIBRATION_PROMPTS = [
    "Explain in simple words why the sky looks blue during the day and red at sunset.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Summarize the main causes of the French Revolution in three bullet points.",
    "Translate to French: The train to the airport leaves every twenty minutes from platform four.",
    "What is the difference between a list and a tuple in Python? Give an example of each.",
    "User: My laptop gets very hot when I watch videos. What can I do?\nAssistant:",
    "SELECT customer_id, SUM(amount) AS total FROM orders WHERE created_at >= '2024-01-01' GROUP BY customer_id ORDER BY total DESC LIMIT 10;",
    "Recipe: preheat the oven to 200 degrees, mix flour, butter and a pinch of salt, then add cold water slowly.",
    "The quarterly report shows revenue of 4.2 million, up 12 percent, while costs rose 7 percent to 3.1 million.",
    "Describe the water cycle for a ten-year-old, including evaporation, condensation and precipitation.",
    "Dear team, the meeting on Thursday is moved to Friday at 10 am. Please update your calendars.",
    "Give me five ideas for a birthday party for someone who loves astronomy.",
    "In mathematics, a prime number is a natural number greater than 1 that has no divisors other than 1 and itself.",
    "How do vaccines train the immune system to recognise a virus?",
    "const total = items.filter(i => i.active).map(i => i.price * i.qty).reduce((a, b) => a + b, 0);",
    "Write a haiku about rain on a tin roof.",
    "List the planets of the solar system in order from the sun, with one fact about each.",
    "El mercado abre a las ocho de la mañana y vende frutas, verduras y pan recién hecho.",
    "What are the pros and cons of working from home? Answer as a balanced paragraph.",
    "Error: connection refused while connecting to database at 10.0.0.5:5432. How do I debug this?",
    "The mitochondria is the organelle where cellular respiration produces most of the cell's energy.",
    "Plan a three-day trip to Kyoto with a focus on temples, gardens and local food.",
    "Compare the time complexity of quicksort, mergesort and heapsort in the best and worst case.",
    "Once upon a time, in a village at the edge of a great forest, there lived an old clockmaker.",
    "Convert 72 degrees Fahrenheit to Celsius and show the steps of the calculation.",
    "Why do cats purr? Give the scientific explanations that are currently considered most likely.",
    "Draft a polite email asking a landlord to repair a leaking kitchen tap.",
    "Der Zug nach Berlin hat heute leider zwanzig Minuten Verspätung wegen einer Signalstörung.",
    "Explain what a Mixture-of-Experts language model is and why it is cheaper to run than a dense one.",
    "1. Open the settings menu.\n2. Select 'Network'.\n3. Turn Wi-Fi off and on again.\n4. If that fails,",
    "A train leaves at 9:15 and travels 180 km at 90 km/h. At what time does it arrive?",
]
