"""Training prompts for the real model's draft: topics x instruction templates, written for this project.

The evaluation prompts (``prompts/chat.txt``, ``prompts/python_docs.txt``, ``prompts/style.txt``) are
never produced here, so acceptance measured on them is held out. :func:`training_prompts` is
deterministic: the same list, in the same order, on every machine.
"""

from __future__ import annotations

import random

import prompts

TOPICS = (
    "the ocean",
    "volcanoes",
    "the moon",
    "black holes",
    "the water cycle",
    "photosynthesis",
    "earthquakes",
    "the human heart",
    "sleep",
    "memory",
    "honeybees",
    "coral reefs",
    "rainforests",
    "deserts",
    "glaciers",
    "electricity",
    "magnets",
    "gravity",
    "light",
    "sound",
    "the periodic table",
    "DNA",
    "vaccines",
    "antibiotics",
    "the immune system",
    "nutrition",
    "exercise",
    "meditation",
    "stress",
    "friendship",
    "the Roman Empire",
    "ancient Egypt",
    "the printing press",
    "the industrial revolution",
    "the Renaissance",
    "the Silk Road",
    "the invention of the telephone",
    "the history of flight",
    "democracy",
    "taxes",
    "inflation",
    "budgeting",
    "saving money",
    "compound interest",
    "starting a small business",
    "marketing",
    "job interviews",
    "writing a resume",
    "public speaking",
    "time management",
    "learning a language",
    "studying for exams",
    "reading more books",
    "writing a novel",
    "poetry",
    "painting",
    "photography",
    "playing the guitar",
    "jazz",
    "classical music",
    "cooking pasta",
    "baking bread",
    "making coffee",
    "growing tomatoes",
    "composting",
    "keeping houseplants alive",
    "adopting a dog",
    "caring for a cat",
    "birds",
    "whales",
    "elephants",
    "climate change",
    "solar power",
    "wind turbines",
    "recycling",
    "electric cars",
    "bicycles",
    "trains",
    "city planning",
    "architecture",
    "bridges",
    "the internet",
    "email etiquette",
    "passwords",
    "computer viruses",
    "cloud computing",
    "databases",
    "spreadsheets",
    "machine learning",
    "neural networks",
    "robots",
    "smartphones",
    "video games",
    "chess",
    "soccer",
    "running a marathon",
    "swimming",
    "hiking",
    "camping",
    "travel on a budget",
    "packing for a trip",
    "Japan",
    "Italy",
    "Brazil",
    "Canada",
    "Kenya",
    "India",
    "mountains",
    "rivers",
    "islands",
    "weather",
    "hurricanes",
    "snow",
    "the seasons",
    "the solar system",
    "Mars",
    "stars",
    "telescopes",
    "microscopes",
    "the scientific method",
    "statistics",
    "probability",
    "prime numbers",
    "geometry",
    "algebra",
    "fractions",
    "logic puzzles",
    "philosophy",
    "ethics",
    "happiness",
    "kindness",
    "habits",
    "motivation",
    "Python lists",
    "Python dictionaries",
    "recursion",
    "sorting algorithms",
    "regular expressions",
    "reading a CSV file in Python",
    "unit testing",
    "version control with git",
    "HTTP",
    "JSON",
)
TEMPLATES = (
    "Tell me about {t}.",
    "Explain {t} to a ten-year-old.",
    "What are three interesting facts about {t}?",
    "Write a short poem about {t}.",
    "Give me a few tips related to {t}.",
    "What is the most common misconception about {t}?",
    "Summarize the key ideas of {t} in one paragraph.",
    "Why does {t} matter?",
    "Write a short story that involves {t}.",
    "What questions should a beginner ask about {t}?",
    "Describe {t} in simple words.",
    "List the pros and cons of {t}.",
    "How would you teach someone about {t}?",
    "Write a friendly email to a colleague about {t}.",
)


def training_prompts(seed: int = 0) -> list[str]:
    """Every topic x template prompt (len(TOPICS) * len(TEMPLATES)), shuffled with ``seed``, minus any
    that equals an evaluation prompt. Returns a new list of strings."""
    held = (
        set(prompts.chat_prompts()) | set(prompts.domain_prompts("python-docs")) | set(prompts.domain_prompts("style"))
    )
    out = [tpl.format(t=t) for t in TOPICS for tpl in TEMPLATES]
    random.Random(seed).shuffle(out)
    return [p for p in out if p not in held]


# The far-domain adapter (stdlib-docs) is served on Python questions, the style adapter (austen) on
# style and format instructions (prompts/python_docs.txt, prompts/style.txt, held out): their draft
# adapters are distilled from the adapted target's answers to prompts of the same kinds, made here.
STDLIB_NAMES = (
    "os.path.join", "os.listdir", "os.environ", "os.makedirs", "shutil.copyfile", "shutil.rmtree",
    "pathlib.Path.glob", "pathlib.Path.read_text", "json.dumps", "json.load", "csv.writer", "csv.DictWriter",
    "re.sub", "re.findall", "re.compile", "math.isclose", "math.gcd", "math.floor", "statistics.median",
    "statistics.mean", "random.choice", "random.shuffle", "random.sample", "itertools.chain", "itertools.product",
    "itertools.islice", "itertools.accumulate", "itertools.combinations", "functools.partial", "functools.reduce",
    "functools.wraps", "collections.defaultdict", "collections.deque", "collections.namedtuple",
    "collections.OrderedDict", "heapq.heappush", "heapq.nlargest", "bisect.bisect_left", "bisect.insort",
    "datetime.datetime.strptime", "datetime.timedelta", "time.sleep", "time.monotonic", "textwrap.dedent",
    "textwrap.wrap", "string.Template", "logging.getLogger", "logging.basicConfig", "typing.Optional",
    "typing.Protocol", "dataclasses.field", "dataclasses.asdict", "enum.Enum", "contextlib.contextmanager",
    "contextlib.suppress", "threading.Thread", "threading.Lock", "queue.Queue", "subprocess.check_output",
    "sys.argv", "sys.exit", "zip", "map", "filter", "any", "all", "isinstance", "getattr", "range", "reversed",
    "min", "max", "sum", "open", "print", "str.join", "str.split", "str.strip", "list.sort", "dict.items",
    "set.union", "hashlib.sha256", "base64.b64encode", "uuid.uuid4", "tempfile.TemporaryDirectory",
    "urllib.parse.urlparse", "sqlite3.connect", "pickle.dumps", "copy.deepcopy", "operator.itemgetter",
)  # fmt: skip
PYTHON_TEMPLATES = (
    "What does `{t}` do in Python?",
    "Show a short example that uses `{t}`.",
    "When should I use `{t}`, and when not?",
    "Explain the arguments of `{t}`.",
    "What does `{t}` return, and what errors can it raise?",
    "Write a docstring for a helper function that wraps `{t}`.",
)
PYTHON_TASKS = (
    "reverses the words of a sentence", "returns the largest of three numbers", "counts the vowels in a string",
    "removes duplicates from a list", "checks whether a number is prime", "sums the digits of an integer",
    "returns the factorial of n", "merges two sorted lists", "finds the most common item in a list",
    "reads a text file and returns its lines", "converts a list of pairs into a dict", "transposes a matrix",
    "returns the n-th triangular number", "validates a date string in YYYY-MM-DD form", "computes a moving average",
    "parses a key=value config file", "capitalizes every word of a title", "rotates a list by k places",
    "groups words by their first letter", "returns the intersection of two lists", "computes the median of a list",
    "formats a number of bytes as KiB, MiB or GiB", "retries a function up to three times", "slugifies a title",
)  # fmt: skip
STYLE_TEMPLATES = (
    "Describe {t} in the style of a Victorian novel.",
    "Answer in exactly three bullet points: what should I know about {t}?",
    "Write a formal letter to a friend about {t}.",
    "Describe {t} as a character in a nineteenth-century novel might.",
    "Explain {t} in two sentences.",
    "Write a short dialogue between two sisters about {t}.",
    "Describe {t} using only short, plain words.",
    "Write a numbered list of four facts about {t}.",
)


def domain_training_prompts(domain: str, seed: int = 0) -> list[str]:
    """Training prompts of an adapter's serving domain: ``"python-docs"`` (``PYTHON_TEMPLATES`` x
    ``STDLIB_NAMES`` and a "write a function" prompt per ``PYTHON_TASKS`` item) or ``"style"``
    (``STYLE_TEMPLATES`` x ``TOPICS``); shuffled with ``seed``, minus the evaluation prompts.

    Raises:
        ValueError: another domain (naming the allowed ones).
    """
    if domain == "python-docs":
        out = [tpl.format(t=t) for t in STDLIB_NAMES for tpl in PYTHON_TEMPLATES]
        out += [f"Write a Python function that {task}." for task in PYTHON_TASKS]
        out += [f"Write a Python function that {task}, with type hints and a docstring." for task in PYTHON_TASKS]
    elif domain == "style":
        out = [tpl.format(t=t) for t in TOPICS for tpl in STYLE_TEMPLATES]
    else:
        raise ValueError(f"no training prompts for domain {domain!r}; allowed: 'python-docs', 'style'")
    held = set(prompts.domain_prompts("python-docs")) | set(prompts.domain_prompts("style"))
    random.Random(seed).shuffle(out)
    return [p for p in out if p not in held]
